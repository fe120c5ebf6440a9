"""Map jobs named in the map-making configs (CreateMap and its variants, CreateLineMap)."""
