"""The upstreamable patch series (patches/) and the tool that checks, applies and refreshes it.

python -m mlx_lm_ext.upstream check   [--release R]   does each patch apply to R's sdist?
python -m mlx_lm_ext.upstream apply   [--release R]   apply, then prove it (verify.py)
python -m mlx_lm_ext.upstream refresh [--release R] [--from TREE]   re-export the series
"""
