"""Fixtures for tests, notebooks and offline demos (as odc-stac and stackstac keep theirs): the synthetic sample."""
