"""The dashboard: its JSON API, its live events, and (later) its pages."""
