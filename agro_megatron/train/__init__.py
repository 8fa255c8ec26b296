"""The AGRO trainer: `run_job(cfg)`; the loop itself is train/loop.py."""
