"""Where engines run: worker processes on this host (`workers.client`, `workers.host`), Ray actors across
a cluster (`workers.ray_cluster`), and the placement that chooses (`workers.start`, `workers.plan`)."""
