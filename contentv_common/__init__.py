"""Framework-free parts shared by both backends: config schema, parameter table, checkpoint I/O, schedules."""
