"""Development tools, not packaged: the local-services manager, the OData fixture server and
`make demo`. Tests, benchmarks and the Makefile use them; the product never does."""
