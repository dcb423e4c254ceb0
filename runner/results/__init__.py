"""Reading what runs left behind: the metadata store, scrape documents and metric histories."""
