"""In-context associative memories (Titans); filled in by the memory issue."""
