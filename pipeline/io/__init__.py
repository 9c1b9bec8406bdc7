"""I/O adapters: event hubs to read from and warehouses to write to, each chosen by URL."""
