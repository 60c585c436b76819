"""Trace-driven serving benchmark: traces, an open-loop driver, latency and SLO measures, plots.

`python -m crosspool_jax.bench.trace generate|run|sweep|report` is the command line
(`trace.py`). The parts, each its own module:

- `traces.py`: one trace record per request (`TraceRequest`), JSONL in and out, time scaling,
  model-name mapping, clipping to the served context lengths, a trace's statistics;
- `generator.py`: seeded synthetic traces (Zipf model popularity, Gamma inter-arrivals of a
  chosen coefficient of variation, named length profiles with a long-context tail);
- `public_traces.py`: the Azure LLM inference and BurstGPT files in their own column formats;
- `latency.py`: one request's stream timing (TTFT, every gap between tokens) and percentiles;
- `http_client.py`: streaming completions and `/metrics` scrapes over HTTP (also used by
  `scripts/load_test.py`);
- `driver.py`: the open-loop driver (requests sent at their arrival times whatever the
  server's state) against the HTTP server or an in-process `AsyncEngine`;
- `results.py`: results.json (overall and per model), the markdown tables;
- `plots.py`: the PNG plots (matplotlib);
- `sweep.py`: one fresh process per mode and setting, merged into comparison tables and plots.
"""
