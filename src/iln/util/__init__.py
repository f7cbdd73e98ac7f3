"""Small helpers with no knowledge of the method: atomic files, process pools, devices."""
