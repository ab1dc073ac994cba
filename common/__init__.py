"""Small helpers shared by every stage (no torch here: serving imports it too)."""
