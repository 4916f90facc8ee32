"""Test suite; a package so helpers import as `tests.sd_layout` however pytest is started."""
