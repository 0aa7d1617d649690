"""MLflow, as the platform uses it: one run per job, its tags, the registry's versions, per-team access.

    tags      the vocabulary: tag names, and where a job's experiment and registered model live (no I/O)
    run       the writer a job uses (`JobRun`: start, report, finish, fail, kill), in the driver and rank 0
    registry  the control plane's side: what a job logged and registered (queries), and claiming names
    auth      MLflow's basic-auth app: one user per team, and the permissions a claim gives

Publishing a finished job's model (gate, card, registry version) is `tuneplane.publishing`, which writes
through these; nothing here imports it.
"""
