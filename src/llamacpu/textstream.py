"""Stop strings on streamed text: text that might be the start of a stop string is held
back until the next piece shows whether it is."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Adds text; returns what is safe to show. After a stop string, nothing more."""
        if self.hit:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        first = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.hit = True
            self.held = ""
            return buf[:first]
        # Keep the longest tail of buf that is a proper prefix of some stop string.
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
