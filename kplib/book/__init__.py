"""What only the book needs: chapter setup, figures, widgets and small analyses."""
