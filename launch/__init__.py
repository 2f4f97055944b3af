"""Launch `experiments.run` on Cloud TPU: TPU VMs and multislice queued resources
(`python -m launch.tpu`) or a JobSet on GKE (`python -m launch.gke`).

Every entry point takes `--dry-run`, which prints the commands (and rendered YAML) it would run
and makes no calls at all. Nothing here is imported by the library.
"""
