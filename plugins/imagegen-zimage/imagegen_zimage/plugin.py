"""Registers this family's models with imagegen (entry point group "imagegen")."""

import imagegen


@imagegen.hookimpl
def register_models(register):
    pass
