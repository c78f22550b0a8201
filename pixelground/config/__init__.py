"""Configs: the base every config file builds on, the strict parser and the shared model / optimizer sections."""
