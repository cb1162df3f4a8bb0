"""Features computed from parsed rows: the text and image encoders (`text`, `image`, which import
torch), `embedding` (the embed stage core that runs both) and the tabular features the boosters
read. Kept free of imports so that importing one module does not pull in the others."""
