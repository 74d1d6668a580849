"""Reading message logs back: verification, readable views, and (later) re-driving state machines."""
