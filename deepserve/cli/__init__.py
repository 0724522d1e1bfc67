"""Command line: `deepserve serve | generate | chat | bench | eval | convert | plan | validate | ops`."""
