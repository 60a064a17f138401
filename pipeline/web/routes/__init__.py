"""The web app's handlers, one module per area; each exports ROUTES for pipeline.web.app.create_app."""
