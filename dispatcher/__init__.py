"""A webhook dispatcher daemon: publish an event in Postgres; every subscriber hears it."""
