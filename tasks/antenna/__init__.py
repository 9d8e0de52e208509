"""trapq as a processing service of Antenna (RolnickLab/antenna): its contract (schemas), an
HTTP client of its pull-mode API (client), and the bridge that turns its tasks into trapq
jobs and trapq's results into its answers (bridge)."""
