"""The long fuzz run: the properties of tests/test_fuzz.py with many more cases.

The default suite runs a few dozen derandomized cases per property so that CI is quick and
repeatable; this runs each property in rounds of `--round` cases, each round with its own
seed (`--seed` + round number, so a run can be repeated exactly), until the property has
tried `--cases` cases or used its share of `--time`. It prints, per property, the cases
tried, the seconds spent and the first failure with hypothesis's minimal example, and
exits 1 if any property failed. `bench/fuzz --help` for options.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any

from hypothesis import given, seed

from tests.fuzz_cases import PROPERTIES
from tests.fuzzing import Fuzzer, fuzz_settings, running_fuzzer


@dataclass
class Tally:
    name: str
    cases: int = 0
    rounds: int = 0
    seconds: float = 0.0
    failure: str = ""


def run_property(fuzzer: Fuzzer, name: str, cases: int, seconds: float, per_round: int,
                 base_seed: int) -> Tally:  # fmt: skip
    """Rounds of `per_round` cases until `cases` were tried or `seconds` passed, or one
    round failed (its minimal example is then in `failure`)."""
    strategy, check = PROPERTIES[name]
    tally = Tally(name)
    started = time.monotonic()

    def counted(case: Any) -> None:
        tally.cases += 1
        check(fuzzer, case)

    while tally.cases < cases and time.monotonic() - started < seconds:
        examples = min(per_round, cases - tally.cases)
        test = fuzz_settings(examples, derandomize=False)(given(strategy)(counted))
        try:
            seed(base_seed + tally.rounds)(test)()
        except Exception as exc:  # a property failed: report it, go on with the next one
            tally.failure = describe(exc)
            break
        finally:
            tally.rounds += 1
    tally.seconds = time.monotonic() - started
    return tally


def describe(exc: BaseException) -> str:
    """Each failure hypothesis found, with its minimal example (in the exception's notes)."""
    if isinstance(exc, BaseExceptionGroup):
        return "\n".join(describe(inner) for inner in exc.exceptions)
    return "".join(traceback.format_exception_only(type(exc), exc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per property (2000)")
    parser.add_argument("--time", type=float, default=900.0,
                        help="seconds for the whole run, shared by the properties")  # fmt: skip
    parser.add_argument("--round", type=int, default=200, help="cases per seeded round (200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first round (0)")
    parser.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(PROPERTIES)}")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(PROPERTIES)
    unknown = set(names) - set(PROPERTIES)
    if unknown:
        parser.error(f"unknown properties: {', '.join(sorted(unknown))}")

    tallies = []
    deadline = time.monotonic() + args.time
    with running_fuzzer() as fuzzer:
        for index, name in enumerate(names):
            share = (deadline - time.monotonic()) / (len(names) - index)
            tally = run_property(fuzzer, name, args.cases, share, args.round, args.seed)
            tallies.append(tally)
            verdict = "FAIL" if tally.failure else "pass"
            print(f"{name:16} {verdict}  {tally.cases:6} cases  {tally.rounds:3} rounds  "
                  f"{tally.seconds:7.1f} s", flush=True)  # fmt: skip
            if tally.failure:
                print("    " + tally.failure.replace("\n", "\n    ").rstrip(), flush=True)
        restarts = fuzzer.restarts
    total = sum(t.cases for t in tallies)
    failed = [t.name for t in tallies if t.failure]
    print(f"{total} cases tried in {sum(t.seconds for t in tallies):.0f} s, "
          f"{len(failed)} of {len(tallies)} properties failed"
          + (f" ({', '.join(failed)})" if failed else "")
          + (f"; the proxy was restarted {restarts} times after a case killed it" if restarts
             else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
