"""File access for local and cloud (`gs://`) paths: one path layer used by every job."""
