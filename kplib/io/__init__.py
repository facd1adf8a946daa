"""The input/output layer: image files (Pillow, DICOM), image folders and their audit, CLIP encoders, the embedding
store, knowledge bases and the LLM client. Nothing here knows the method."""
