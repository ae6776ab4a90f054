"""The sections of ``results/REPORT.md``, one small module per kind of run.

``experiments/report.py`` discovers the runs under ``--results`` and assembles the report; each
module here turns one run (its ``metrics.json`` and ``config.json``) into markdown lines and the
README rows it contributes (docs/architecture.md, "Artifacts"):

| module | runs | section |
|---|---|---|
| ``quality`` | ``experiments/quality.py`` | sample quality (Frechet distance) per network |
| ``training_path`` | ``experiments/training_path.py`` | methods vs a network as it trains |
| ``compare`` | ``experiments/compare.py`` | score comparison, one section per (dataset, network) |
| ``sensitivity`` | ``experiments/sensitivity.py`` | sensitivity fields (radius, cosine, IoU) |
| ``linear_gd`` | ``experiments/linear_gd.py`` | GD-trained linear denoisers vs Wiener |
| ``data_stats`` | ``experiments/data_stats.py`` | link injection, permuted pixels, faces' PCs |
| ``guidance`` | ``experiments/guidance.py`` | class-conditional samples |
| ``training`` | ``checkpoints/*`` | the trained networks |
| ``paper`` | ``experiments/paper_numbers.json`` + compare runs | the paper's numbers vs ours |

Shared helpers live in ``common``; the paired verdict rule (docs/algorithms.md §13) in
``paired``. Every function is pure apart from reading run files.
"""
