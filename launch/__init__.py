"""Launchers: local.sh (one host), slurm.sbatch (SLURM, multi-node), sweep.py (many configs)."""
