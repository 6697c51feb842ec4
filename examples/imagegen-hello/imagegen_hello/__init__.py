"""imagegen-hello: the smallest complete imagegen plugin (see docs/writing-a-plugin.md)."""
