"""The dead-letter queues: their topics as assets, the replay job and the sensor that launches it."""
