"""Published attacks, each written against a ``QueryFn`` so that it runs through
the gateway or directly against the model unchanged."""
