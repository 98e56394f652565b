"""Export: the native checkpoint writer/loader, interop formats and packed-weight kernels."""
