"""What a KV setting costs and keeps: memory tables, measurements, quality.

- `memory`: the KV bytes table from config.json (exact per layer, no weights loaded)
- `measure`: prefill, quantize and time a cache (shared by tests and benchmarks)
- `quality`: teacher-forced log-probabilities, KL and top-1 against 16-bit
- `sweep`: --measure's points across context lengths, its table and plot
- `cli`: `python -m mlx_lm_ext.report`
"""
