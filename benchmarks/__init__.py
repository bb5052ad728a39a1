"""samkd's benchmarks: `python -m benchmarks` runs them all and rewrites BENCHMARKS.md.

Each module's `run(quick) -> Section` measures one thing against a baseline taken in the same
run; `benchmarks/gpu_check.sh` covers what needs a GPU.
"""
