"""Problem sets, prompt formats, answer extraction and grading."""
