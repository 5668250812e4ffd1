#!/usr/bin/env python3
"""Feeds events recorded by sdk_check.py to Pipecat's own OpenAI Realtime server-event parser.

    PY tests/realtime/pipecat_check.py EVENTS.jsonl [EVENTS2.jsonl ...]

PY is `scripts/realtime-sdk python 3` (the venv with pipecat-ai). Each line is
{"case": ..., "event": {...}}; every event except Parley's `parley.*` extensions goes through
`pipecat.services.openai.realtime.events.parse_server_event` (pydantic models, the ones Pipecat's
OpenAIRealtimeLLMService parses the server's events with). An event type Pipecat has no model
for is reported (Pipecat ignores those) but neither passes nor fails. Prints a line per failing
event type (with the first error), then exactly `N passed, M failed`; exits 1 on any failure.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

from loguru import logger

logger.remove()  # importing pipecat logs a banner to stderr

from pipecat.services.openai.realtime.events import parse_server_event


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: pipecat_check.py EVENTS.jsonl [EVENTS2.jsonl ...]", file=sys.stderr)
        return 2
    passed = 0
    failures: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    unmodelled: Counter[str] = Counter()
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                    event = record["event"]
                    etype = str(event.get("type"))
                    case = record.get("case", "?")
                except (ValueError, KeyError, AttributeError) as e:
                    failures["<bad line>"] += 1
                    first_error.setdefault("<bad line>", f"{where}: {e}")
                    continue
                if etype.startswith("parley."):
                    continue
                try:
                    parsed = parse_server_event(json.dumps(event))
                except Exception as e:  # noqa: BLE001 - parse_server_event raises a bare Exception
                    failures[etype] += 1
                    message = str(e).split("\n\n")[0].replace("\n", " ")
                    first_error.setdefault(
                        etype, f"{where} (case {case}, {event.get('event_id')}): {message[:800]}"
                    )
                    continue
                if parsed is None:
                    unmodelled[etype] += 1
                else:
                    passed += 1
    for etype, count in sorted(failures.items()):
        print(f"FAIL {etype} x{count}: {first_error[etype]}")
    if unmodelled:
        listed = ", ".join(f"{t} x{n}" for t, n in sorted(unmodelled.items()))
        print(f"not modelled by Pipecat (ignored by it): {listed}")
    failed = sum(failures.values())
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
