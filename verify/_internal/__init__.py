"""The verifier's internals: each module checks one thing, from specs/ (never from training/)."""
