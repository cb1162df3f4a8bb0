"""Reports over pipeline outputs (`pricefuse evaluate`) and the exploratory data analysis of the
notebooks. Reads files only; comparing MLflow runs lives in `pricefuse.recording.compare`."""
