"""Command-line tools over the library (`python -m dsv3_jax.tools.NAME`): plan, bench, bench_decode, eval,
experiments, plot, params, prepare, tokenizer.
"""
