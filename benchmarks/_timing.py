"""The benchmarks' one way to time steps: warm-up, timed steps between two device synchronisations, median of rounds.

A step loop the benchmark writes itself goes through `timed_loop`; a library loop that owns its steps (`train_sae`, the
`Trainer`) is timed with a `Clock` that the loop's batch source starts (`clocked`) or a callback starts and stops.
`rounds` runs every side once per round, in turn, so a slow phase of the machine hits all sides alike.
"""
import time

import torch


def sync(device) -> None:
    "Wait for the device's queued work (CUDA); nothing on the CPU."
    device = torch.device(device)
    if device.type == "cuda": torch.cuda.synchronize(device)


class Clock:
    "Wall seconds from `start()` to `stop()`, the device synchronised at both, so queued work counts in full."
    def __init__(self, device): self.device, self.t0, self.t1 = torch.device(device), None, None

    def start(self) -> None: sync(self.device); self.t0 = time.perf_counter()

    def stop(self) -> float: sync(self.device); self.t1 = time.perf_counter(); return self.seconds

    @property
    def seconds(self) -> float:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the clock was not started and stopped: fewer steps ran than warm-up + timed steps")
        return self.t1 - self.t0


def check_counts(steps: int, warmup: int, rounds: int = 1, min_warmup: int = 1) -> None:
    "Raise ValueError naming the count unless `steps` ≥ 1, `warmup` ≥ `min_warmup` and `rounds` ≥ 1 are integers."
    for name, value, low in (("steps", steps, 1), ("warmup", warmup, min_warmup), ("rounds", rounds, 1)):
        if not (isinstance(value, int) and value >= low): raise ValueError(f"{name}={value!r} must be an integer ≥ {low}")


def timed_loop(step, steps: int, warmup: int, device) -> float:
    "Seconds of calls `warmup … warmup + steps − 1` of `step(i)`, after the warm-up calls `0 … warmup − 1`."
    check_counts(steps, warmup, min_warmup=0)
    clock = Clock(device)
    for i in range(warmup + steps):
        if i == warmup: clock.start()
        step(i)
    return clock.stop()


def clocked(items, warmup: int, clock: Clock):
    "Yield `items`, starting `clock` when item `warmup` is asked for (the warm-up items' work is then done)."
    for i, item in enumerate(items):
        if i == warmup: clock.start()
        yield item


def rounds(sides: dict, n_rounds: int) -> dict[str, list]:
    "Call each of `sides` ({name: () -> result}) once per round, in turn: {name: [its result in each round]}."
    check_counts(1, 1, n_rounds)
    results = {name: [] for name in sides}
    for _ in range(n_rounds):
        for name, run in sides.items(): results[name].append(run())
    return results


def median_round(results: list, key=lambda r: r):
    "The result of the median round by `key` (of an even count, the lower middle one: always a round that ran)."
    ordered = sorted(results, key=key)
    return ordered[(len(ordered) - 1) // 2]
