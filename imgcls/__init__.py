"""imgcls."""
