"""Accuracy evaluation of any OpenAI-compatible endpoint (`deepserve eval`).

Layout: datasets.py loads the user's copies of the benchmark files (MMLU-Pro's Parquet through
pyarrow, the `eval` extra); tasks.py pairs each with its prompt and scorer; extract.py
and math_equiv.py read and check answers (sympy's part, latex_sympy.py, in a worker
process with a time limit per answer); client.py talks HTTP with retries; cache.py keeps
every reply so runs resume; runner.py wires them; stats.py and report.py turn per-item
scores into tables, intervals and paired comparisons. Talks HTTP only (see DESIGN.md), so it
measures any server, not just ours.
"""
