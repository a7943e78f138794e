// Ends the MSL part of an emulator translation unit: the address-space words become ordinary
// identifiers again, so host code (orchard's headers) can follow the included kernels.
#undef device
#undef threadgroup
#undef constant
#undef thread
