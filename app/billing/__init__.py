"""Provider-neutral billing objects: customers and subscriptions mirrored from the providers."""
