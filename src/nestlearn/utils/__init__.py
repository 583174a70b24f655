"""Small helpers shared by every layer (file safety, seeding, devices)."""
