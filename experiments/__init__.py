"""Research beside the product: studies that use the `sclslt` package and that the package never imports.
Run their tools from the checkout's root as modules (`python -m experiments.<study>.<tool>`)."""
