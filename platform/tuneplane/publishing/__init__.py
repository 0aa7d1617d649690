"""What a finished job hands to its consumers, run by the job's driver after training:

    gate      does the result meet the spec's `eval.gate`? (a policy: facts in, a verdict out, no I/O)
    modelcard the card that says what the model is, how it was tuned and how to load it
    publish   the tuned model into the job's MLflow run and, when the gate passes, a registry version

The model consumers load (`tuneplane.pyfunc_model`) stays at the package's top level: registered versions name
its module path.
"""
