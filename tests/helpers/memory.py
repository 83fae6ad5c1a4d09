"""Peak scratch memory of a call, from the profiler's memory events (they see the allocations
the launchers make inside custom ops; a TorchDispatchMode does not).  Frees are paired with the
latest allocation of the same size, so the peak of the live scratch (allocations freed before the
call returns) is measured, not the sum of everything allocated."""
from torch.profiler import ProfilerActivity, profile


def peak_scratch_bytes(fn):
    """(peak bytes of the allocations made and freed inside fn, fn's result)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.nbytes() != 0)
    open_allocs, live = {}, [0] * (len(events) + 1)
    for index, (_, nbytes) in enumerate(events):
        if nbytes > 0:
            open_allocs.setdefault(nbytes, []).append(index)
        elif open_allocs.get(-nbytes):
            for k in range(open_allocs[-nbytes].pop(), index):
                live[k] += -nbytes
    return max(live), out
