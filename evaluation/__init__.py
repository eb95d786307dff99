"""The evaluation harness: benign traffic, real attacks and the report.

Everything here is a client of the gateway: queries go through Kafka and the
workers with API keys like any other client's, never into the worker's
internals. The only in-process use of the model is the "without the gateway"
baseline and the ground truth that agreement is measured against.

Imports the gateway's client-side modules (client, protocol, config, keys,
models, stack, topics), numpy, scikit-learn, ART and matplotlib; never
``gateway.worker`` or ``detectors``.
"""
