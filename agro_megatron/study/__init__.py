"""Scaling studies (`agro-study`): a grid of agro-train runs from one spec, run locally or as Slurm
job arrays, resumed cell by cell, and reported with intervals over seeds and fitted scaling curves.

Modules: spec (the study YAML), cells (a cell's id, directory and status file), launch (how one cell
runs and heartbeats), local (the local runner), slurm (job-array scripts), results (what a finished
run directory holds), compute (training + generation FLOPs), report (tables, fits, plots), and stats
(the statistics, a plain library).
"""
